def on_chat_messages(messages):
    yield "I forgot the class"
