"""The protocol skins: each translates its wire format to and from the one Service
(app.serving.service). No torch here."""
