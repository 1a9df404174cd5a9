"""Sub-commands of the s3-sysbackup CLI, one module each."""
