"""The on-disk format: manifest, data files, names, checksums (``spec/FORMAT.md``)."""
