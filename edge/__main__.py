from edge.app.cli import main

main()
