"""potstill inside other libraries' training loops: :mod:`.transformers` (a ``Trainer`` that
distills with potstill's objectives and teacher sources)."""
