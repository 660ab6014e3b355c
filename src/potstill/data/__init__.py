"""Data: datasets of tensors and their batches (:mod:`.tensors`), splits and labelled fractions
(:mod:`.splits`), and the built-in corpora (:mod:`.images`, :mod:`.fortunes`,
:mod:`.instructions`)."""
