"""The Textual debugger: views over engine objects (see app.py); nothing here decides qcow2 rules."""
