"""Model access: one chat call under the deadline layer, behind the provider seam."""
