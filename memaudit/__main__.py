from memaudit.cli.app import main

main()
