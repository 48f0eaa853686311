"""The live view's page, served by live_routes.py: index.html, live.js and live.css, plain and self-contained
(no library, nothing fetched from the network), shipped as package data."""
