"""The static GPU check: docs/design.md section 3 (what the compiler must make of the kernels)."""
