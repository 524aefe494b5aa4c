"""CIFAR data: host-side loading (`cifar`, `sources`) and device-side
augmentation (`augment`). `msdfuse_jax.input_pipeline` re-exports the API."""
