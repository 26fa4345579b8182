"""Same-host data planes behind the expert transport (POSIX shared memory for CPU ranks)."""
