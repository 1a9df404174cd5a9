"""Administrator-side tools: deploy the stack, write a host's config, users, credentials, index rebuilds.

These need boto3 (and `cryptography` for encrypted credentials without ccrypt): the `provision` extra.
They are imported only by the provisioning sub-commands, so a host that only archives stays small.
"""
