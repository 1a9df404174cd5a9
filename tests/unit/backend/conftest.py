from sysbackup_testkit import backend  # noqa: F401  (the moto-backed services fixture)
