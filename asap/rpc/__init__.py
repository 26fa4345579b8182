"""gRPC glue shared by the services and the client: status mapping, server scaffolding, channel options."""
