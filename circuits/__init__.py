"""circuits: edge attribution patching (EAP, EAP-IG) over a networkx-exportable circuit graph."""
