"""Where the text comes from: OpenWebText, local files, the IOI prompt set."""
