"""Jobs and tasks: the state machine and the operations that change them."""
