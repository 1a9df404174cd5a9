"""devstack/sysbackup_local"""
