"""The usage dashboard: a page served by the API, and the JSON it reads."""
