"""Benchmark tooling that ships with the package: the split benchmark (`cfm bench split`), its center
process and center-only baseline, its plots, and the link emulator (`cfm link`). Nothing in the runtime
imports it; `benchmarks/` holds the scripts of the other benchmarks and every result."""
