//! STAND-IN for helper B's `cli::vm_config` (same names) until it lands: a few fields of
//! Cloud Hypervisor's VmConfig, enough for serve's tests. The lead replaces the `use` of it
//! in serve/mod.rs with `crate::cli::vm_config` and deletes this file.

use clap::Parser;
use serde_json::Value;

use crate::cli::run::RunArgs;
use crate::cli::{Cli, Command};

/// The config as sent (objects only).
#[derive(Clone, Debug, serde::Serialize)]
#[serde(transparent)]
pub struct VmConfigJson(Value);

/// Parses the body; refuses `disks` and anything not an object.
pub fn parse(body: &[u8]) -> Result<VmConfigJson, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("the body: {e}"))?;
    let Value::Object(map) = &v else {
        return Err("the body must be a JSON object (a VmConfig)".into());
    };
    if map.contains_key("disks") {
        return Err("`disks`: vmm has no block devices; remove it".into());
    }
    Ok(VmConfigJson(v))
}

impl VmConfigJson {
    /// The arguments after `vmm run`.
    pub fn to_run_args(&self) -> Vec<String> {
        let v = &self.0;
        let mut a = Vec::new();
        let mut push = |flag: &str, value: String| {
            a.push(flag.to_string());
            a.push(value);
        };
        if let Some(n) = v["cpus"]["boot_vcpus"].as_u64() {
            push("--cpus", n.to_string());
        }
        if let Some(n) = v["memory"]["size"].as_u64() {
            push("--memory", format!("{}K", n >> 10));
        }
        for (key, flag) in [("kernel", "--kernel"), ("initramfs", "--initrd")] {
            if let Some(s) = v["payload"][key].as_str() {
                push(flag, s.to_string());
            }
        }
        if let Some(s) = v["payload"]["cmdline"].as_str() {
            push("--cmdline", s.to_string());
        }
        let list = v["user_devices"].as_array().cloned().unwrap_or_default();
        if list.is_empty() {
            push("--user-device", "none".into());
        }
        for d in list {
            push("--user-device", d["socket"].as_str().unwrap_or("").into());
        }
        if let Some(f) = v["serial"]["file"].as_str() {
            push("--serial-log", f.to_string());
        }
        if let Some(n) = v["vmm"]["timeout"].as_f64() {
            push("--timeout", n.to_string());
        }
        a
    }

    /// What `vmm run` would refuse, refused the same way.
    pub fn check(&self) -> Result<RunArgs, String> {
        let argv = ["vmm".to_string(), "run".to_string()]
            .into_iter()
            .chain(self.to_run_args());
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Command::Run(args) = cli.command else {
            return Err("not a run".into());
        };
        crate::cli::run::config(&args).map_err(|e| e.to_string())?;
        Ok(*args)
    }
}
