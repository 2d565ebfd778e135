"""The HTTP API, one router per concern; ``server.app.create_app`` assembles them."""
