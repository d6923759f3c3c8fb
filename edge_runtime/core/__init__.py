"""The shared core: what the device, the sync server, the exporter and the demo all use (the face
path, the head and its math, the wire format, the model package, bounded npz reading, atomic
writes, the camera's adaptation math, metrics, splits). It imports nothing from the device,
sync, watch or annotate above it (tests/test_layout_rules.py)."""
