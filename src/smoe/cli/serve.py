"""`smoe serve` (built in the next commit)."""
REGISTER = ()
