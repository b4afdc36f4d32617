"""The embedded CPU demo: digits data, the tiny SD-shaped stack, pre-training, the digit classifier, the frontier."""
