"""The app's pages, one script each (run by `st.navigation`, not imported)."""
