"""The IBISAgent MONAI Label app's own package (MONAI Label names an app's package ``lib``).

``configs/`` holds one task config per file (discovered by ``main.py``), ``infers/`` the infer tasks and shared
request handling, ``trainers/`` the train tasks. All logic lives in the ``ibisagent`` library.
"""
