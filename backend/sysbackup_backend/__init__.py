"""backend/sysbackup_backend"""
