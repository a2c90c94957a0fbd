//! The endpoints `vmm` serves, at Cloud Hypervisor's paths: the one list of them.

/// The HTTP methods the API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

impl Method {
    /// As on the request line: `GET`.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }

    /// The method named `name` on a request line, if the API uses it.
    pub fn from_name(name: &str) -> Option<Method> {
        [Method::Get, Method::Put]
            .into_iter()
            .find(|m| m.as_str() == name)
    }
}

/// Every path is under this prefix, as Cloud Hypervisor's.
pub const PREFIX: &str = "/api/v1/";

/// One endpoint: a path and the method it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    VmmPing,
    VmmShutdown,
    VmCreate,
    VmBoot,
    VmInfo,
    VmCounters,
    VmPause,
    VmResume,
    VmShutdown,
    VmDelete,
    VmReboot,
}

impl Endpoint {
    /// Every endpoint, in the order the spec lists them.
    pub const ALL: [Endpoint; 11] = [
        Endpoint::VmmPing,
        Endpoint::VmmShutdown,
        Endpoint::VmCreate,
        Endpoint::VmBoot,
        Endpoint::VmInfo,
        Endpoint::VmCounters,
        Endpoint::VmPause,
        Endpoint::VmResume,
        Endpoint::VmShutdown,
        Endpoint::VmDelete,
        Endpoint::VmReboot,
    ];

    /// The name after [`PREFIX`]: `vm.info`.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::VmmPing => "vmm.ping",
            Endpoint::VmmShutdown => "vmm.shutdown",
            Endpoint::VmCreate => "vm.create",
            Endpoint::VmBoot => "vm.boot",
            Endpoint::VmInfo => "vm.info",
            Endpoint::VmCounters => "vm.counters",
            Endpoint::VmPause => "vm.pause",
            Endpoint::VmResume => "vm.resume",
            Endpoint::VmShutdown => "vm.shutdown",
            Endpoint::VmDelete => "vm.delete",
            Endpoint::VmReboot => "vm.reboot",
        }
    }

    /// The method it takes: GET for what only reads, PUT for the rest (as Cloud Hypervisor).
    pub fn method(self) -> Method {
        match self {
            Endpoint::VmmPing | Endpoint::VmInfo | Endpoint::VmCounters => Method::Get,
            _ => Method::Put,
        }
    }

    /// Whether the request carries a JSON body.
    pub fn takes_body(self) -> bool {
        matches!(self, Endpoint::VmCreate)
    }

    /// The endpoint whose [`name`](Self::name) is `name`.
    pub fn from_name(name: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.name() == name)
    }

    /// The full path: `/api/v1/vm.info`.
    pub fn path(self) -> String {
        format!("{PREFIX}{}", self.name())
    }
}
