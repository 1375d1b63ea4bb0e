"""The parts of one DHO2 step, each owning its state: the base optimizer, the Newton momentum, the ADMM
coupling and the non-finite guard (docs/design.md, "The step")."""
