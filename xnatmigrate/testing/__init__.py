"""Test rig shared by the tests, the demo and the benchmarks (embedded PostgreSQL, synthetic DICOM)."""
