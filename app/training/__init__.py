"""The offline trainer (claims 6-12). Never imported by the serving code."""
