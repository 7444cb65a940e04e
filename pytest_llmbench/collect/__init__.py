"""Collection, in the pytest process: suite files -> checked cases -> pytest items."""
