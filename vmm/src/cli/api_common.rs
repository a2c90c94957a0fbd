//! What `vmm serve` and `vmm run --api-socket` answer alike, written once for both.

use api::Response;

/// `GET vmm.ping`: Cloud Hypervisor's VmmPingResponse. `build_version` is the git
/// description when the build was given one (`VMM_BUILD_VERSION`), else the crate version.
pub fn ping() -> Response {
    let version = env!("CARGO_PKG_VERSION");
    Response::json(
        200,
        &serde_json::json!({
            "build_version": option_env!("VMM_BUILD_VERSION").unwrap_or(version),
            "version": version,
            "pid": std::process::id(),
            "features": [],
        }),
    )
}
