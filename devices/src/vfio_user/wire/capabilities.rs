//! The capabilities each side states in VERSION, and the JSON object that carries them
//! (`{"capabilities": {...}}`), read and written with serde.
//!
//! The JSON is peer input of at most one message ([`super::MAX_MESSAGE`]); serde_json refuses
//! nesting past 128 levels, so a hostile peer cannot make the parser recurse without bound.
//! Where serde_json is stricter or looser than the hand-written parser it replaced (JSON as
//! RFC 8259 has it, where the old one was lenient): numbers with leading zeros and strings
//! with an unpaired `\u` surrogate are refused, and nesting is bounded at 128 levels, not 32.

use serde::de::{Deserializer, Error as _};
use serde::{Deserialize, Serialize};

use super::{WireError, MAX_DATA_XFER, MAX_FDS};

/// Capabilities exchanged in VERSION (those this crate uses; the rest are ignored).
///
/// Never proposed, so never in use: `migration` (a server that offers it anyway has it
/// ignored: the spec lets the client proceed without what it did not propose),
/// `twin_socket` (server-to-client commands share the one socket) and `write_multiple`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Most fds the sender accepts in one message (default 1).
    pub max_msg_fds: u32,
    /// Largest REGION_READ/WRITE and DMA_READ/WRITE count the sender accepts (default 1 MiB).
    pub max_data_xfer_size: u32,
    /// Most DMA mappings the sender keeps at once (default 65535).
    pub max_dma_maps: u32,
    /// DMA page sizes, or'ed (default 4 KiB): every DMA_MAP address and size is a multiple
    /// of the smallest.
    pub pgsizes: u64,
}

/// The spec's default for `max_dma_maps`.
pub const DEFAULT_MAX_DMA_MAPS: u32 = 65535;

impl Default for Capabilities {
    /// The spec's defaults for a peer that sends no capabilities.
    fn default() -> Self {
        Capabilities {
            max_msg_fds: 1,
            max_data_xfer_size: MAX_DATA_XFER as u32,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            pgsizes: 4096,
        }
    }
}

/// The `capabilities` member as the spec lays it out: each field may be left out (the spec's
/// default applies), members this crate does not use (`migration`, `twin_socket`, ...) are
/// skipped whatever they hold, and a field that is there must be an integer from 0 to
/// `u64::MAX` (not null, not a fraction or an exponent).
#[derive(Debug, Default, Deserialize, Serialize)]
struct CapabilitiesJson {
    #[serde(default, deserialize_with = "max_msg_fds")]
    max_msg_fds: Option<u64>,
    #[serde(default, deserialize_with = "max_data_xfer_size")]
    max_data_xfer_size: Option<u64>,
    #[serde(default, deserialize_with = "max_dma_maps")]
    max_dma_maps: Option<u64>,
    #[serde(default, deserialize_with = "pgsizes")]
    pgsizes: Option<u64>,
}

/// The object VERSION carries: `capabilities` is the one member the spec defines.
#[derive(Debug, Serialize)]
struct VersionJson {
    capabilities: CapabilitiesJson,
}

/// One deserializer per field, so that the error names the field (serde's own does not).
macro_rules! integer_fields {
    ($($name:ident),*) => {$(
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
            u64::deserialize(d).map(Some).map_err(|_| {
                D::Error::custom(concat!(stringify!($name), " is not a non-negative integer"))
            })
        }
    )*};
}
integer_fields!(max_msg_fds, max_data_xfer_size, max_dma_maps, pgsizes);

impl Capabilities {
    /// What this crate offers (both sides).
    pub fn ours() -> Self {
        Capabilities {
            max_msg_fds: MAX_FDS as u32,
            max_data_xfer_size: MAX_DATA_XFER as u32,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            pgsizes: 4096,
        }
    }

    /// The JSON the spec describes, every field stated.
    pub fn to_json(self) -> String {
        let json = VersionJson {
            capabilities: CapabilitiesJson {
                max_msg_fds: Some(self.max_msg_fds.into()),
                max_data_xfer_size: Some(self.max_data_xfer_size.into()),
                max_dma_maps: Some(self.max_dma_maps.into()),
                pgsizes: Some(self.pgsizes),
            },
        };
        serde_json::to_string(&json).expect("integers under fixed names always serialize")
    }

    /// The smallest DMA page size (`pgsizes` has at least one bit set).
    pub fn min_pgsize(self) -> Option<u64> {
        (self.pgsizes != 0).then(|| 1u64 << self.pgsizes.trailing_zeros())
    }

    /// Parses the peer's JSON; missing fields take the spec's defaults, unknown ones are
    /// ignored (a repeated one counts once, the last), and an empty string means "no
    /// capabilities". Counts past `u32::MAX` are taken as `u32::MAX`.
    pub fn from_json(json: &str) -> Result<Self, WireError> {
        let mut caps = Capabilities::default();
        if json.is_empty() {
            return Ok(caps);
        }
        // Through a `Value` first: a derived struct would also take a JSON array of its
        // fields, and the spec's object is an object.
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| WireError::Invalid(format!("version JSON does not parse: {e}")))?;
        if !value.is_object() {
            return Err(WireError::Invalid("version JSON is not an object".into()));
        }
        let Some(c) = value.get("capabilities") else {
            return Ok(caps);
        };
        if !c.is_object() {
            return Err(WireError::Invalid(
                "version JSON: \"capabilities\" is not an object".into(),
            ));
        }
        let theirs = CapabilitiesJson::deserialize(c)
            .map_err(|e| WireError::Invalid(format!("version JSON: {e}")))?;
        let clamp32 = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        if let Some(v) = theirs.max_msg_fds {
            caps.max_msg_fds = clamp32(v);
        }
        if let Some(v) = theirs.max_data_xfer_size {
            caps.max_data_xfer_size = clamp32(v);
        }
        if let Some(v) = theirs.max_dma_maps {
            caps.max_dma_maps = clamp32(v);
        }
        if let Some(v) = theirs.pgsizes {
            caps.pgsizes = v;
        }
        Ok(caps)
    }
}
