"""The operator's side: `manage.py`'s commands (status, backups, broker users, schemas) and the
supervisor that runs the parts and the broker for `runserver`. No part imports from here."""
