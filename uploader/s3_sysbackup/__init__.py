"""uploader/s3_sysbackup"""
