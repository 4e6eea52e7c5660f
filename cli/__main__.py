from arcflow.cli.app import main

main()
