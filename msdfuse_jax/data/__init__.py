"""CIFAR data: host-side reading (`sources`: TFDS and the official archives), the validation split,
statistics and per-process shares (`cifar`), and device-side augmentation (`augment`)."""
