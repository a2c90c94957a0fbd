//! `vm.create`'s body into a [`VmConfigJson`]: one section at a time, so that every refusal
//! names the field's path (`memory.zones[1].size`), then the checks that need no host.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::{ConsoleConfig, ConsoleMode, MemoryConfig, MemoryZoneConfig, VmConfigJson};

/// Cloud Hypervisor's sections that `vmm` has no device or feature for, with what is missing.
const UNSUPPORTED: [(&str, &str); 19] = [
    ("disks", "vmm has no block devices"),
    ("net", "vmm has no network devices"),
    ("rng", "vmm has no virtio-rng device"),
    ("fs", "vmm has no virtio-fs device"),
    ("pmem", "vmm has no persistent-memory devices"),
    ("vsock", "vmm has no vsock device"),
    ("balloon", "vmm has no balloon device"),
    ("sgx_epc", "vmm has no SGX enclave memory"),
    ("iommu", "vmm has no virtual IOMMU"),
    ("watchdog", "vmm has no watchdog device"),
    (
        "platform",
        "vmm has no platform settings (serial number, UUID, OEM strings)",
    ),
    ("tpm", "vmm has no TPM device"),
    ("landlock_enable", "vmm has no Landlock sandbox"),
    ("landlock_rules", "vmm has no Landlock sandbox"),
    ("pvpanic", "vmm has no pvpanic device"),
    (
        "rate_limit_groups",
        "vmm has no rate limiters (it has no block or network devices)",
    ),
    ("debug_console", "vmm has no debug console port"),
    (
        "preserved_fds",
        "vmm takes no file descriptors over the API",
    ),
    ("vdpa", "vmm has no vDPA devices"),
];

#[cfg(test)]
pub(super) const UNSUPPORTED_FOR_TESTS: [(&str, &str); 19] = UNSUPPORTED;

/// The top-level fields `vmm` reads.
const FIELDS: [&str; 9] = [
    "cpus",
    "memory",
    "payload",
    "devices",
    "user_devices",
    "numa",
    "serial",
    "console",
    "vmm",
];

/// Why a `vm.create` body is refused: each names the field and what to send instead.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigJsonError {
    #[error("the body is not valid JSON ({reason} at line {line}, column {column}); send one VmConfig object")]
    Malformed {
        reason: String,
        line: usize,
        column: usize,
    },
    #[error("the body is {0}, not a JSON object; send one VmConfig object such as {{\"cpus\": {{\"boot_vcpus\": 1}}}}")]
    NotObject(&'static str),
    #[error("`{section}`: {why}; remove the section")]
    Unsupported {
        section: &'static str,
        why: &'static str,
    },
    #[error("`{path}`: vmm does not know this field; remove it (the fields here are {known})")]
    UnknownField { path: String, known: String },
    #[error("`{path}`: {reason}; send it as the API spec (docs/api/openapi.yaml) describes")]
    Invalid { path: String, reason: String },
    #[error("`{path}` {value:?} is a relative path; give an absolute one (the VMM's working folder is not the client's)")]
    RelativePath { path: String, value: String },
    #[error("`{0}` has a NUL character; remove it")]
    Nul(String),
    #[error("`cpus.max_vcpus` {max} differs from `cpus.boot_vcpus` {boot}: vmm has no CPU hotplug; leave max_vcpus out or make it equal")]
    MaxVcpus { boot: u64, max: u64 },
    #[error("`{field}.mode` {mode:?}: vmm's {field} takes {takes}; use one of them")]
    Mode {
        field: &'static str,
        mode: ConsoleMode,
        takes: &'static str,
    },
    #[error("`serial.file` is given with `serial.mode` {0:?}; give mode File with it, or leave file out")]
    FileWithoutFileMode(ConsoleMode),
    #[error("`serial.mode` File needs `serial.file`: give the file's absolute path")]
    FileModeWithoutFile,
    #[error("`vmm.backing` and `memory.shared`/`hugepages`/`thp` both choose how guest RAM is backed; give one of them")]
    TwoBackings,
    #[error("`memory.zones[{index}].id` {id:?}: give a non-empty id of letters, digits, `-`, `_` and `.`")]
    ZoneId { index: usize, id: String },
    #[error("`numa[{index}].memory_zones` names {id:?}: give the id of one of `memory.zones`")]
    NumaZoneName { index: usize, id: String },
}

/// Parses a `vm.create` body and refuses, naming the field, what `vmm` does not have or what
/// is malformed. What needs `vmm run`'s checks (sizes, bounds, the host) is `check`'s.
pub fn parse(body: &[u8]) -> Result<VmConfigJson, ConfigJsonError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ConfigJsonError::Malformed {
        reason: reason_of(&e),
        line: e.line(),
        column: e.column(),
    })?;
    let Value::Object(object) = value else {
        return Err(ConfigJsonError::NotObject(kind_of(&value)));
    };
    nul_free(&Value::Object(object.clone()), "")?;
    let mut config = VmConfigJson::default();
    for (key, value) in object {
        if let Some(&(section, why)) = UNSUPPORTED.iter().find(|(s, _)| *s == key) {
            return Err(ConfigJsonError::Unsupported { section, why });
        }
        match key.as_str() {
            "cpus" => config.cpus = nullable(value, &key)?,
            "memory" => config.memory = nullable_with(value, &key, memory)?,
            "payload" => config.payload = nullable(value, &key)?,
            "devices" => config.devices = list(value, &key)?,
            "user_devices" => config.user_devices = list(value, &key)?,
            "numa" => config.numa = list(value, &key)?,
            "serial" => config.serial = nullable(value, &key)?,
            "console" => config.console = nullable(value, &key)?,
            "vmm" => config.vmm = nullable(value, &key)?,
            _ => {
                return Err(ConfigJsonError::UnknownField {
                    path: key,
                    known: quoted(&FIELDS),
                })
            }
        }
    }
    config.validate()?;
    Ok(config)
}

impl VmConfigJson {
    /// The checks that need neither `vmm run`'s parser nor the host.
    pub(super) fn validate(&self) -> Result<(), ConfigJsonError> {
        if let Some(c) = &self.cpus {
            match c.max_vcpus {
                Some(max) if max != c.boot_vcpus => {
                    return Err(ConfigJsonError::MaxVcpus {
                        boot: c.boot_vcpus,
                        max,
                    })
                }
                _ => {}
            }
        }
        let mut paths: Vec<(String, &std::path::Path)> = Vec::new();
        if let Some(p) = &self.payload {
            paths.extend(p.kernel.as_deref().map(|k| ("payload.kernel".into(), k)));
            paths.extend(
                p.initramfs
                    .as_deref()
                    .map(|i| ("payload.initramfs".into(), i)),
            );
        }
        for (i, d) in self.devices.iter().enumerate() {
            paths.push((format!("devices[{i}].path"), &d.path));
        }
        for (i, d) in self.user_devices.iter().enumerate() {
            paths.push((format!("user_devices[{i}].socket"), &d.socket));
        }
        if let Some(file) = self.serial.as_ref().and_then(|s| s.file.as_deref()) {
            paths.push(("serial.file".into(), file));
        }
        if let Some((path, value)) = paths.into_iter().find(|(_, p)| !p.is_absolute()) {
            return Err(ConfigJsonError::RelativePath {
                path,
                value: value.display().to_string(),
            });
        }
        check_serial(self.serial.as_ref())?;
        if let Some(c) = &self.console {
            if c.mode != ConsoleMode::Off || c.file.is_some() {
                return Err(ConfigJsonError::Mode {
                    field: "console",
                    mode: c.mode,
                    takes: "only Off (it has no virtio-console; the guest's console is the serial port)",
                });
            }
        }
        let memory = self.memory.as_ref();
        let chosen =
            memory.is_some_and(|m| m.shared.is_some() || m.hugepages.is_some() || m.thp.is_some());
        if chosen && self.vmm.as_ref().is_some_and(|v| v.backing.is_some()) {
            return Err(ConfigJsonError::TwoBackings);
        }
        let zones = memory.map_or(&[][..], |m| &m.zones[..]);
        check_zone_ids(zones)?;
        for (index, node) in self.numa.iter().enumerate() {
            if let Some(id) = node.memory_zones.iter().find(|id| !zone_id_ok(id)) {
                return Err(ConfigJsonError::NumaZoneName {
                    index,
                    id: id.clone(),
                });
            }
        }
        Ok(())
    }
}

fn check_serial(serial: Option<&ConsoleConfig>) -> Result<(), ConfigJsonError> {
    let Some(s) = serial else { return Ok(()) };
    match (s.mode, &s.file) {
        (ConsoleMode::Pty | ConsoleMode::Socket, _) => Err(ConfigJsonError::Mode {
            field: "serial",
            mode: s.mode,
            takes: "Tty (the VMM's stdout), File (with `file`), Null or Off (output dropped)",
        }),
        (ConsoleMode::File, None) => Err(ConfigJsonError::FileModeWithoutFile),
        (mode, Some(_)) if mode != ConsoleMode::File => {
            Err(ConfigJsonError::FileWithoutFileMode(mode))
        }
        _ => Ok(()),
    }
}

/// A zone id is written into `--memory-zone id=...` and `--numa memory_zones=[...]`, whose
/// separators it must not hold.
fn zone_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn check_zone_ids(zones: &[MemoryZoneConfig]) -> Result<(), ConfigJsonError> {
    match zones.iter().position(|z| !zone_id_ok(&z.id)) {
        Some(index) => Err(ConfigJsonError::ZoneId {
            index,
            id: zones[index].id.clone(),
        }),
        None => Ok(()),
    }
}

/// `memory`, with its zones one at a time so that an error names the zone.
fn memory(value: Value, path: &str) -> Result<MemoryConfig, ConfigJsonError> {
    let mut value = value;
    let zones = match &mut value {
        Value::Object(map) => map.remove("zones"),
        _ => None,
    };
    let mut memory: MemoryConfig = typed(value, path)?;
    if let Some(zones) = zones {
        memory.zones = list(zones, &format!("{path}.zones"))?;
    }
    Ok(memory)
}

fn nullable<T: DeserializeOwned>(value: Value, path: &str) -> Result<Option<T>, ConfigJsonError> {
    nullable_with(value, path, typed)
}

fn nullable_with<T>(
    value: Value,
    path: &str,
    read: impl Fn(Value, &str) -> Result<T, ConfigJsonError>,
) -> Result<Option<T>, ConfigJsonError> {
    match value {
        Value::Null => Ok(None),
        v => read(v, path).map(Some),
    }
}

/// An array, each item on its own so that an error names its index.
fn list<T: DeserializeOwned>(value: Value, path: &str) -> Result<Vec<T>, ConfigJsonError> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| typed(item, &format!("{path}[{i}]")))
            .collect(),
        other => Err(ConfigJsonError::Invalid {
            path: path.to_string(),
            reason: format!("expected an array, got {}", kind_of(&other)),
        }),
    }
}

/// One object into its type; serde's unknown-field error becomes the field's own path, and
/// a wrong value the path of the field that holds it.
fn typed<T: DeserializeOwned>(value: Value, path: &str) -> Result<T, ConfigJsonError> {
    // Read from pretty text, one field per line, so that the error's line says which field.
    let text = serde_json::to_string_pretty(&value).unwrap_or_default();
    serde_json::from_str(&text).map_err(|e| {
        let reason = reason_of(&e);
        match unknown_field(&reason) {
            Some((field, known)) => ConfigJsonError::UnknownField {
                path: format!("{path}.{field}"),
                known,
            },
            None => ConfigJsonError::Invalid {
                path: match field_at(&text, e.line()) {
                    Some(field) => format!("{path}.{field}"),
                    None => path.to_string(),
                },
                reason,
            },
        }
    })
}

/// The object's own field (indented one level) whose value holds line `line` (1-based) of
/// its pretty text; `None` for the object's braces (a missing field, a wrong type of the
/// whole).
fn field_at(text: &str, line: usize) -> Option<&str> {
    let mut lines: Vec<&str> = text.lines().take(line).collect();
    if lines.last().is_none_or(|l| !l.starts_with(' ')) {
        return None;
    }
    lines.reverse();
    lines.iter().find_map(|l| {
        let key = l.strip_prefix("  \"")?;
        key.split_once("\":").map(|(k, _)| k)
    })
}

/// serde's "unknown field `x`, expected one of `a`, `b`" (or "expected `a`") as the field and
/// the list.
fn unknown_field(reason: &str) -> Option<(String, String)> {
    let rest = reason.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let known = rest
        .strip_prefix(", expected one of ")
        .or_else(|| rest.strip_prefix(", expected "))
        .unwrap_or("none")
        .to_string();
    Some((field.to_string(), known))
}

/// serde_json's message without the position it appends (given apart where there is one).
fn reason_of(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(at) if e.line() > 0 => text[..at].to_string(),
        _ => text,
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn quoted(names: &[&str]) -> String {
    let names: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    names.join(", ")
}

/// Strings become command-line arguments, which cannot hold a NUL: refused here, by path.
fn nul_free(value: &Value, path: &str) -> Result<(), ConfigJsonError> {
    let at = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match value {
        Value::String(s) if s.contains('\0') => Err(ConfigJsonError::Nul(path.to_string())),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| nul_free(v, &format!("{path}[{i}]"))),
        Value::Object(map) => nul_free_map(map, at),
        _ => Ok(()),
    }
}

fn nul_free_map(
    map: &Map<String, Value>,
    at: impl Fn(&str) -> String,
) -> Result<(), ConfigJsonError> {
    for (key, value) in map {
        if key.contains('\0') {
            return Err(ConfigJsonError::Nul(at(key)));
        }
        nul_free(value, &at(key))?;
    }
    Ok(())
}
