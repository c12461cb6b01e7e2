"""The code verifier's halves that run inside the sandbox, sent there as source (see ``code.py``)."""
