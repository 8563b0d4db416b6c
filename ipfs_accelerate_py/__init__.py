"""ipfs_accelerate_py namespace: dsi provides ``ipfs_accelerate_py.datasets_integration``."""
