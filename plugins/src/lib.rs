//! Transform plugins. The WASM host (wasmtime, component model) lands here; until then
//! pipelines run without transforms.
