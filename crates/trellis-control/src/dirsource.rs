//! Directory config source (work in progress).
