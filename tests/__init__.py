"""A package, so that tests/ops/test_<op>.py and tests/kernels/test_<op>.py can share a file name."""
