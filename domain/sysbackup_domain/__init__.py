"""domain/sysbackup_domain"""
