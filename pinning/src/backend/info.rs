//! What a backend is, as one plain value: the pinner plans a job around it (admission,
//! thread counts, the phases), so every wrapper passes one value on instead of forwarding
//! query after query. The bottom of `backend`: it imports nothing from the rest of it.

/// A way of preparing guest RAM, as the command line and the reports name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    None,
    Populate,
    Mlock,
    Type1,
    Iommufd,
    VfioUser,
}

impl BackendKind {
    /// Every kind, in the order the command line lists them.
    pub const ALL: [BackendKind; 6] = [
        BackendKind::None,
        BackendKind::Populate,
        BackendKind::Mlock,
        BackendKind::Type1,
        BackendKind::Iommufd,
        BackendKind::VfioUser,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::None => "none",
            BackendKind::Populate => "populate",
            BackendKind::Mlock => "mlock",
            BackendKind::Type1 => "type1",
            BackendKind::Iommufd => "iommufd",
            BackendKind::VfioUser => "vfio-user",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of backend kinds: the kinds a backend maps through (several for several devices).
/// Iterates in the order of [`BackendKind::ALL`], each kind once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindSet(u8);

impl KindSet {
    /// The set holding `kind` alone.
    pub const fn of(kind: BackendKind) -> Self {
        // The enum's declaration order is `ALL`'s, so its discriminant is its place there.
        Self(1 << kind as u8)
    }

    pub fn contains(self, kind: BackendKind) -> bool {
        self.0 & Self::of(kind).0 != 0
    }

    pub fn union(self, other: KindSet) -> Self {
        Self(self.0 | other.0)
    }

    pub fn iter(self) -> impl Iterator<Item = BackendKind> {
        BackendKind::ALL
            .into_iter()
            .filter(move |&k| self.contains(k))
    }
}

/// What a backend is and needs: what `PinBackend::describe` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// The kind reports name: the backend's own, or the first device's for several.
    pub kind: BackendKind,
    /// Every kind the backend maps through (several for several devices).
    pub kinds: KindSet,
    /// Whether the mapped bytes count against RLIMIT_MEMLOCK.
    pub locks_memory: bool,
    /// Whether RAM must be faulted in before `map` (it counts against the memory cgroup).
    /// The pinner does the faulting, in cancellable steps, so `map` only locks or maps.
    pub populates: bool,
    /// How many threads `map` may usefully run on; `Some(1)` where the kernel serialises.
    pub map_threads: Option<usize>,
    /// Populate all of RAM in parallel before the (serial) map phase.
    pub populate_first: bool,
    /// How many separate mappings the backend can hold (type1's `dma_entry_limit`).
    pub max_mappings: Option<u64>,
}

impl BackendInfo {
    /// A backend of `kind` that needs RAM faulted in, maps on any number of threads, holds
    /// any number of mappings and locks nothing; a backend sets what differs over this.
    pub const fn new(kind: BackendKind) -> Self {
        Self {
            kind,
            kinds: KindSet::of(kind),
            locks_memory: false,
            populates: true,
            map_threads: None,
            populate_first: false,
            max_mappings: None,
        }
    }

    /// Several backends driven as one (each chunk mapped by every part): the first part's
    /// kind, every part's kinds, what any part needs, and the tightest of their limits.
    /// No parts describe a `none` backend that maps through nothing.
    pub fn combine(parts: impl IntoIterator<Item = BackendInfo>) -> Self {
        let mut parts = parts.into_iter();
        let Some(first) = parts.next() else {
            return Self {
                kinds: KindSet::default(),
                populates: false,
                ..Self::new(BackendKind::None)
            };
        };
        parts.fold(first, |all, part| Self {
            kind: all.kind,
            kinds: all.kinds.union(part.kinds),
            locks_memory: all.locks_memory || part.locks_memory,
            populates: all.populates || part.populates,
            map_threads: min_limit(all.map_threads, part.map_threads),
            populate_first: all.populate_first || part.populate_first,
            max_mappings: min_limit(all.max_mappings, part.max_mappings),
        })
    }
}

/// The tighter of two optional limits (none is no limit).
fn min_limit<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_set_holds_each_kind_once_in_command_line_order() {
        let set = KindSet::of(BackendKind::VfioUser)
            .union(KindSet::of(BackendKind::Type1))
            .union(KindSet::of(BackendKind::VfioUser));
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            [BackendKind::Type1, BackendKind::VfioUser]
        );
        assert!(set.contains(BackendKind::Type1) && !set.contains(BackendKind::Iommufd));
        assert_eq!(KindSet::default().iter().count(), 0);
    }

    #[test]
    fn several_backends_combine_into_what_any_needs_within_the_tightest_limit() {
        let iommufd = BackendInfo {
            locks_memory: true,
            ..BackendInfo::new(BackendKind::Iommufd)
        };
        let type1 = |entries| BackendInfo {
            locks_memory: true,
            map_threads: Some(1),
            populate_first: true,
            max_mappings: Some(entries),
            ..BackendInfo::new(BackendKind::Type1)
        };
        let all = BackendInfo::combine([iommufd, type1(100), type1(50)]);
        assert_eq!(
            all.kind,
            BackendKind::Iommufd,
            "the first part names the job"
        );
        assert_eq!(
            all.kinds.iter().collect::<Vec<_>>(),
            [BackendKind::Type1, BackendKind::Iommufd]
        );
        assert!(all.locks_memory && all.populates && all.populate_first);
        assert_eq!((all.map_threads, all.max_mappings), (Some(1), Some(50)));
        assert_eq!(BackendInfo::combine([iommufd]), iommufd);
        let none = BackendInfo::combine([]);
        assert_eq!(
            (none.kind, none.kinds),
            (BackendKind::None, KindSet::default())
        );
        assert!(!none.populates && !none.locks_memory);
    }
}
