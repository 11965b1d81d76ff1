//! End-to-end tests: real `switchyard` processes on loopback with OS-chosen ports.
//! One test binary for the crate; each module covers one area.

mod admission;
mod bench;
mod chaos;
mod common;
mod deps;
mod engine_http;
mod k8s;
mod kvaware;
mod lora;
mod observe;
mod pd;
mod pd_engine;
mod prefix;
mod resume;
mod router;
