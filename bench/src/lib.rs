//! Sallyport's benchmarks. Criterion micro-benches live in `benches/` (`cargo bench -p
//! sallyport-bench`); each bench file is named after the module it measures.
