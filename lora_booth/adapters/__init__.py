"""The files people share: the neutral adapter, the diffusers and kohya layouts, their metadata, the
checks on untrusted files, and merge / convert / resize / extract."""
