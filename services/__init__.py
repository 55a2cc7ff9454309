"""The node's four services: gateway, billing, wallet and discovery."""
