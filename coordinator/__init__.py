"""The coordinator: owns all scheduling state and decides what runs where."""
