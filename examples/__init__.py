"""Examples that use edgetailor as its users do (not part of the installed package)."""
